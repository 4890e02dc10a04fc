"""The top layer: the `align` command line (main.py) and `align pipeline` (pipeline.py); they import the stages
and labeling, which never import them."""
