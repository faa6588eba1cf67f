"""rest_fast.models"""
