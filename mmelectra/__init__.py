"""mmelectra: ELECTRA-style pretraining of an LXMERT-architecture image-text encoder."""
