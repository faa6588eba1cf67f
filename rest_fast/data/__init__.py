"""rest_fast.data"""
