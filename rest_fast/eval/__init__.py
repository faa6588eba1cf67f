"""rest_fast.eval"""
