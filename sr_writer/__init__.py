"""sr_writer package."""
