"""Generated stubs of the Tinker SDK's wire schema; see scripts/gen_tinker_proto.py."""
