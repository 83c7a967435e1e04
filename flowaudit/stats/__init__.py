"""Encoder features, the streaming float64 Gaussian behind ``s_OOD``, its file, and the risk figures."""
