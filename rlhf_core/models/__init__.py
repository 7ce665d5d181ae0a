"""Models: tiny demo models (`tiny`), tokenizers (`tokenizer`), loading and saving
(`loading`, `building`), value and reward heads (`heads`)."""
