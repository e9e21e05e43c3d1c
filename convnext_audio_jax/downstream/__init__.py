"""Downstream tasks on a frozen encoder: language-based audio retrieval, text search over recordings, captioning."""
