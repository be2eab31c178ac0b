"""fedvault's ClientApp and local trainer."""
