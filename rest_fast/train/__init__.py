"""rest_fast.train"""
