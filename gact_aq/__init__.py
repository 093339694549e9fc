"""gact_aq"""
