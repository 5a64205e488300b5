"""Building blocks and the NestedUNet."""
