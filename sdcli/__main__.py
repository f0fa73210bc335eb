"""`python -m sdcli` is `sd`; torchrun starts it so: `torchrun --nproc_per_node=N -m sdcli train RECIPE`."""

from sdcli.cli import main

if __name__ == "__main__":
    main()
