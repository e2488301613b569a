"""Format writers and readers, one module per on-disk layout."""
