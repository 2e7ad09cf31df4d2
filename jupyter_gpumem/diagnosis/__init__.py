"""The diagnosis: the data model, the causes as rules, and how it reads (text and HTML). Pure."""
