"""tagstore.v1: generated from ``proto/tagstore/v1/tagstore.proto``. Do not edit."""
