"""Generated gRPC/protobuf code of the tagstore API (see ``proto/``; regenerate with
``python scripts/gen_proto.py``)."""
