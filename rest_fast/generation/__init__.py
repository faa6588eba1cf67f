"""rest_fast.generation"""
