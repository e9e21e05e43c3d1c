"""Files this package writes and reads back: model directories, export metadata, durable writes, locks."""
