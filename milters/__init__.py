"""keyrelay milters: header-From identity check and DKIM signing."""
