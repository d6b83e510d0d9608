"""Test doubles: executable stand-ins for host tools, their fixtures, and helper processes."""
