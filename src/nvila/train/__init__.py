"""Training side of nvila (datasets first; recipes, PEFT and the loop build on nvila.api/processing)."""
