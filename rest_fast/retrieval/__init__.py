"""rest_fast.retrieval"""
