"""The middle layer beside the stages: human rankings in Argilla (`align label`, `align eval human`): the server,
pushing completions, pulling preference pairs, choosing what to rank. Imports only the core (`align`)."""
