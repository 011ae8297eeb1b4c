"""Passive capture: pcap/live packets, TCP reassembly, protocol parsers, call pairing."""
