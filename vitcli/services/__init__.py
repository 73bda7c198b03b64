"""What the commands do; no typer or rich here. Progress goes through plain callbacks."""
