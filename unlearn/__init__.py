"""unlearn."""
