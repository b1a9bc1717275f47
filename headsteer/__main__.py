"""``python -m headsteer`` (what ``accelerate launch -m headsteer`` runs)."""
from headsteer.cli import main

main()
