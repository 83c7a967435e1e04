"""Reading what users hand in: condition sets (images, arrays, HDF5) and untrusted files."""
