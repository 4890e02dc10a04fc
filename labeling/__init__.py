"""Human rankings in Argilla (`align label`): the server, pushing completions, pulling preference pairs."""
