"""What a run is asked to do: samples per input, temperature, seeds, the latent layout and the device."""
