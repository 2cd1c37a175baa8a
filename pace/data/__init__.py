"""Webdataset shards: writer, streaming pipeline, transforms and the generated quickstart dataset."""
