"""Context management: token estimates and fitting conversations to each tier's window."""
