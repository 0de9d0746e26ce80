"""Building blocks every layer uses: errors, registries, atomic files, key roles, processes, signals."""
