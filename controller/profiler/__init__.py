"""Measuring a live SGLang PD deployment: the source method's empirical step (see `measure`)."""
