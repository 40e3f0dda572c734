"""I/O adapters of the storage service: bucket backends, object index, HTTP app."""
