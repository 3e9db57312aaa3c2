"""Tests of the quota stores."""
