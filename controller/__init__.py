"""pd-controller: keeps the prefill/decode split of a disaggregated SGLang fleet right, live."""

__version__ = "0.1.0"
