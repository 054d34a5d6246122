"""What a run leaves behind: config, metrics table and summary in its own directory."""
