"""One module per InstructGPT stage; each reads top to bottom like a script and imports only `align`."""
