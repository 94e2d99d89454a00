-- Reserved for another branch's migration (tamper evidence); replaced by it at merge.
SELECT 1;
