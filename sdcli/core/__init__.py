"""Layer 1 (bottom): what every layer uses. Errors for people (`errors`), data files read line by
line (`data`), checked output paths (`outputs`). Imports nothing from sdcli."""
