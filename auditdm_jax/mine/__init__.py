"""Mining: the trained auditor's probes -> exemplars and named failure types."""
