"""Plain-torch reference implementations: the one definition each kernel must match."""
