"""The bottom layer: atomic writes, target locks, the stop flag and plain-value formatting.

Every layer may import it; it imports nothing of flowaudit's.
"""
