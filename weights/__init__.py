"""Public checkpoints: where they come from, their checksums, and a resumable verified download."""
