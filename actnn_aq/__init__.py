"""actnn_aq"""
