"""The HTTP shell: parse, validate, hand a batch to the core, answer."""
