"""Unit tests of nicbench's parts that need no root, KVM or guest (standard library only):
  python3 -m unittest discover -s scripts/nicbench/tests -t scripts"""
