"""The HTTP layer both services share: roles and tokens (`security`), the request guard that
checks them and the body limits before anything is parsed (`guard`), and the settings every
service reads for them (`settings`)."""
