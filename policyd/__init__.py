"""keyrelay policy daemon: Postfix SASL (dovecot protocol), policy and socketmap services."""
