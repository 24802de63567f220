"""DiNAT backbone and its neighborhood-attention op."""
