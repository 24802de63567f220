"""SeMask: semantic-attention Swin backbone, semantic branch head, meta-architecture."""
