"""Generated from protos/ditserve/v1 by protos/generate.py; do not edit."""
